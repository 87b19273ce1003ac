"""Logits of our model equal transformers' on tiny random checkpoints (fp32, CPU, 1e-4)."""
import torch

from rlpt_fast.model import causal_attention

ATOL = 1e-4


def _chat(proc, content) -> str:
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                    tokenize=False)


def _check_one(pair, text, images=None):
    inputs = pair.proc(text=[text], images=images, return_tensors="pt")
    ref = pair.ref_forward(**inputs)[0]
    with torch.no_grad():
        ours = pair.ours.logits(inputs["input_ids"][0], inputs.get("pixel_values"), inputs.get("image_grid_thw"))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    return inputs


def test_text_only(pair):
    _check_one(pair, _chat(pair.proc, "Describe the dog in the park, please."))


def test_one_image(pair, image):
    inputs = _check_one(pair, _chat(pair.proc, [{"type": "image"}, {"type": "text", "text": "Who is it?"}]),
                        [image(84, 112, seed=1)])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]]


def test_three_images_of_different_sizes_interleaved(pair, image):
    content = [{"type": "text", "text": "First"}, {"type": "image"}, {"type": "text", "text": "then"},
               {"type": "image"}, {"type": "image"}, {"type": "text", "text": "what changed?"}]
    images = [image(84, 112, 2), image(56, 56, 3), image(200, 140, 4)]
    inputs = _check_one(pair, _chat(pair.proc, content), images)
    # windows of 2x2 merged blocks do not tile 7x5: partial windows are exercised on Qwen2.5-VL
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8], [1, 4, 4], [1, 14, 10]]


def test_padded_batch_equals_flat_concatenation(pair, image):
    """Theirs: a right-padded batch with attention mask. Ours: the valid tokens concatenated,
    one rope_positions per sequence, causal_attention(cu_seqlens)."""
    texts = [_chat(pair.proc, [{"type": "image"}, {"type": "text", "text": "Caption it."}]),
             _chat(pair.proc, "A much longer prompt about a cat sleeping on the blue sofa in the sun."),
             _chat(pair.proc, [{"type": "text", "text": "Two:"}, {"type": "image"}, {"type": "image"}])]
    images = [image(56, 84, 5), image(112, 56, 6), image(84, 84, 7)]
    inputs = pair.proc(text=texts, images=images, padding=True, return_tensors="pt")
    ref = pair.ref_forward(**inputs)
    mask = inputs["attention_mask"].bool()
    assert len(set(mask.sum(1).tolist())) == 3  # really different lengths
    grids = inputs["image_grid_thw"]
    per_seq_images = [1, 0, 2]
    seqs, positions, g0 = [], [], 0
    for row, n_img in zip(range(3), per_seq_images):
        ids = inputs["input_ids"][row][mask[row]]
        pos, _ = pair.ours.rope_positions(ids, grids[g0:g0 + n_img] if n_img else None)
        seqs.append(ids)
        positions.append(pos)
        g0 += n_img
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    m = pair.ours
    with torch.no_grad():
        embeds = m.embed(torch.cat(seqs), m.encode_images(inputs["pixel_values"], grids))
        hidden = m.forward_hidden(embeds, torch.cat(positions, dim=1), causal_attention(cu))
        ours = m.compute_logits(hidden)
    torch.testing.assert_close(ours, ref[mask], atol=ATOL, rtol=0)


def test_bf16_error_is_no_worse_than_transformers_bf16(pair, image):
    """Low precision: our bf16 logits are as close to the fp32 reference as transformers' bf16 ones
    (at most twice the error), i.e. we round in the same places (norms and rotary in fp32)."""
    from transformers import AutoModelForImageTextToText

    from rlpt_fast.model import load_model

    text = _chat(pair.proc, [{"type": "image"}, {"type": "text", "text": "Describe the small boat."}])
    inputs = pair.proc(text=[text], images=[image(84, 56, 8)], return_tensors="pt")
    exact = pair.ref_forward(**inputs)[0]
    ref16 = AutoModelForImageTextToText.from_pretrained(pair.path, local_files_only=True, dtype=torch.bfloat16).eval()
    inputs16 = dict(inputs, pixel_values=inputs["pixel_values"].bfloat16())
    theirs = type(pair)(pair.path, pair.ours, ref16, pair.proc).ref_forward(**inputs16)[0].float()
    ours16 = load_model(pair.path, dtype=torch.bfloat16)
    with torch.no_grad():
        ours = ours16.logits(inputs["input_ids"][0], inputs16["pixel_values"], inputs["image_grid_thw"]).float()
    their_err = (theirs - exact).abs().max().item()
    assert 0 < their_err < 1.0
    assert (ours - exact).abs().max().item() <= 2 * their_err
