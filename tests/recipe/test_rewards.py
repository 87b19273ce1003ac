"""Rewards: RePIC's quirks reproduced under compat="repic", fixed under "strict"."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlpt_fast.rewards import SolutionError, iou, parse_box, repic_iou, score

LONG = " and that is the whole story of this picture, told with enough words to pass it" * 2


def s(method, text, sol, compat="strict", **ctx):
    return score(method, text, sol, compat=compat, **ctx)


@pytest.mark.parametrize("text,repic,strict", [
    ("yes", 1, 1), ("Yes.", 1, 1), ("YES, it is.", 1, 1),
    ("I don't know, maybe yes", 0, 1),      # "know" reads as "no" for RePIC
    ("Her eyes say no", 1, 0),              # "eyes" reads as "yes"
    ("nope", 0, 0), ("no", 0, 0), ("", 0, 0), ("yesterday: no", 1, 0),
])
def test_yes_no_word_boundaries(text, repic, strict):
    assert s("yes_no", text, "yes", "repic") == repic
    assert s("yes_no", text, "yes") == strict


def test_yes_no_solution_no():
    assert s("yes_no", "No, it is not there.", "no") == 1.0
    assert s("yes_no", "Nothing like it; yes.", "no", "repic") == 1.0   # "no" inside "Nothing"
    assert s("yes_no", "Nothing like it; yes.", "no") == 0.0


@pytest.mark.parametrize("compat", ["repic", "strict"])
def test_single_name_length_case_and_anti_hacking(compat):
    assert s("yes_no_name", "<Anya> waves.", "<Anya>", compat) == 0.0          # under 100 chars
    assert s("yes_no_name", "<Anya> waves" + LONG, "<Anya>", compat) == 1.0
    assert s("yes_no_name", "<anya> waves" + LONG, "<Anya>", compat) == 0.0    # case-sensitive
    assert s("yes_no_name", "<Anya></Anya> waves" + LONG, "<Anya>", compat) == 0.0
    assert s("yes_no_name", "x" * 99, "x", compat) == 0.0
    assert s("yes_no_name", "x" * 100, "x", compat) == 1.0


@pytest.mark.parametrize("compat", ["repic", "strict"])
def test_multi_name_fraction_no_anti_hacking(compat):
    text = "<A> and </B> meet <C>" + LONG
    assert s("yes_no_name_multi", text, ["<A>", "<B>", "<C>", "<D>"], compat) == 0.5
    assert s("yes_no_name_multi", "<A> <B>", ["<A>", "<B>"], compat) == 0.0
    assert s("yes_no_name_multi", "<A>" + LONG, "<A>", compat) == 1.0   # a string is one name


def test_iou_formula_quirks():
    assert repic_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    # inclusive intersection 0..8 (9 px) against exclusive areas 100 + 100 - 81
    assert repic_iou([0, 0, 10, 10], [1, 1, 11, 11]) == pytest.approx(81 / 119)
    assert iou([0, 0, 10, 10], [1, 1, 11, 11]) == pytest.approx(81 / 119)
    # a one-pixel-wide overlap counts as nothing for RePIC
    assert repic_iou([0, 0, 10, 10], [9, 0, 20, 10]) == 0.0
    assert iou([0, 0, 10, 10], [9, 0, 20, 10]) == pytest.approx(10 / 200)


def test_boxes_in_both_syntaxes_and_scale():
    gt = [100, 50, 300, 250]
    plain = "The box is [100, 50, 300, 250]."
    qwen = '```json\n[{"bbox_2d": [50, 25, 150, 125], "label": "dog"}]\n```'
    assert s("iou", plain, gt, "repic") == 1.0 and s("iou", plain, gt) == 1.0
    # Qwen2.5-VL answers in its resized input frame (here half size): RePIC compares raw.
    assert s("iou", qwen, gt, "repic") == 0.0
    assert s("iou", qwen, gt, scale=0.5) == 1.0
    assert s("iou", qwen, gt, scale=(0.5, 0.5), continuous_iou=True) == pytest.approx(1.0)
    assert parse_box('{"bbox_2d": [1.5, 2, 3, 4]} then [9, 9, 9, 9]') == [1.5, 2, 3, 4]
    assert parse_box("[1, 2, 3] [4, 5, 6, 7]") == [4, 5, 6, 7]


def test_out_of_frame_and_negative_boxes():
    gt = [0, 0, 100, 100]
    assert s("iou", "[-20, -20, 90, 90]", gt, "repic") == 0.0      # no match for negatives
    assert s("iou", "[-20, -20, 90, 90]", gt) == 1.0                # 8100 / 12100 = 0.67
    assert s("iou", "[5000, 5000, 9000, 9000]", gt) == 0.0
    assert s("iou", "[0, 0, 100, 100000]", gt) == 0.0
    assert s("iou", "[0, 0, " + "9" * 400 + ", 100]", gt, "repic") == 0.0
    assert s("iou", "[0, 0, " + "9" * 400 + ", 100]", gt) == 0.0
    assert s("iou", "[10, 10, 5, 5]", gt, continuous_iou=True) == 0.0  # inverted: empty box


@pytest.mark.parametrize("method,sol", [("yes_no", "yes"), ("yes_no_name", "<A>"),
                                        ("yes_no_name_multi", ["<A>"]), ("iou", [0, 0, 5, 5])])
@pytest.mark.parametrize("compat", ["repic", "strict"])
def test_empty_and_non_string_completions_score_zero(method, sol, compat):
    assert s(method, "", sol, compat) == 0.0
    assert s(method, None, sol, compat) == 0.0


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300), compat=st.sampled_from(["repic", "strict"]),
       method=st.sampled_from(["yes_no", "yes_no_name", "yes_no_name_multi", "iou"]))
def test_any_text_gives_a_number_in_unit_interval(text, compat, method):
    sol = {"yes_no": "no", "yes_no_name": "<A>", "yes_no_name_multi": ["<A>", "<B>"],
           "iou": [1, 2, 30, 40]}[method]
    r = score(method, text + "[1, 2, 30, 41]" * (len(text) % 2), sol, compat=compat, scale=0.7)
    assert 0.0 <= r <= 1.0


@pytest.mark.parametrize("method,sol,msg", [
    ("iou", [1, 2, 3], "4 numbers"), ("iou", "[1,2,3,4]", "must be a list"),
    ("yes_no", ["yes"], "'yes' or 'no'"), ("yes_no", "maybe", "'yes' or 'no'"),
    ("yes_no_name", 3, "non-empty string"), ("yes_no_name_multi", [], "non-empty list"),
    ("caption", "x", "unknown accu_reward_method"),
])
def test_wrong_solution_type_names_the_row(method, sol, msg):
    with pytest.raises(SolutionError, match=rf"row train\.jsonl:line 7: .*{msg}"):
        score(method, "text", sol, row="train.jsonl:line 7")


def test_real_captions(repic):
    """Names each caption contains are known from the file; check the rewards on them."""
    two = json.loads((repic / "captioning/double_concept/captioning-skip-retrieval-ours.json")
                     .read_text())
    # Row 0 names both concepts and is long: full reward; a short RAP caption with both: 0.
    assert len(two[0][2]) >= 100 and all(k in two[0][2] for k in two[0][1])
    assert s("yes_no_name_multi", two[0][2], two[0][1], "repic") == 1.0
    rap = json.loads((repic / "captioning/double_concept/"
                      "caption-rap-llava-skip-retreival_RAP-llava-sft-2k.json").read_text())
    assert rap[0][2] == "<Anya> is playing with her <Bond> the white dog.</s>"
    assert s("yes_no_name_multi", rap[0][2], rap[0][1], "repic") == 0.0
    for rows in (two, rap):
        for img, keys, cap, _ in rows:
            want = 0.0 if len(cap) < 100 else sum(cap.find(k) >= 0 for k in keys) / len(keys)
            assert s("yes_no_name_multi", cap, keys, "repic") == want
            hacked = cap.find("</" + keys[0][1:]) >= 0
            want1 = float(len(cap) >= 100 and cap.find(keys[0]) >= 0 and not hacked)
            assert s("yes_no_name", cap, keys[0]) == want1
    # 4-concept keys are lower-case ("<thor>") but the model is shown "<Thor>": a verbatim,
    # case-sensitive reward never fires on RePIC's own 4-concept captions.
    quad = json.loads((repic / "captioning/quad_concept/captioning-skip-retrieval-ours.json")
                      .read_text())
    assert "<Thor>" in quad[1][2]
    assert sum(s("yes_no_name_multi", c, k, "repic") for _, k, c, _ in quad) == 0.0
