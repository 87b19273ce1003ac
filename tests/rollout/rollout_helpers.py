"""Helpers shared by the engine tests: tiny prompts, our model, transformers' generate."""
import inspect

import torch


def load_ours(path):
    from rlpt_fast import load_model

    return load_model(path, dtype=torch.float32).eval()


def load_theirs(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def prompt(cfg, seed: int, text_lens: list[int], grids: list[list[int]] = ()):
    """Token ids with images between text runs: (ids (T,), pixel_values | None, grid | None)."""
    gen = torch.Generator().manual_seed(seed)
    merge = cfg.vision.spatial_merge_size ** 2
    parts = [torch.randint(0, 300, (text_lens[0],), generator=gen)]
    for g, n in zip(grids, text_lens[1:]):
        parts += [torch.tensor([cfg.vision_start_token_id]), torch.full((g[0] * g[1] * g[2] // merge,), cfg.image_token_id),
                  torch.tensor([cfg.vision_end_token_id]), torch.randint(0, 300, (n,), generator=gen)]
    ids = torch.cat(parts)
    if not grids:
        return ids, None, None
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.vision.patch_dim, generator=gen)
    return ids, pixels, grid


def hf_greedy(ref, ids, pixels, grid, max_new_tokens):
    """transformers' generate, greedy, one prompt; returns the new tokens (EOS included)."""
    kwargs = dict(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=max_new_tokens,
                  do_sample=False)
    if pixels is not None:
        kwargs.update(pixel_values=pixels, image_grid_thw=grid)
        if "mm_token_type_ids" in inspect.signature(ref.forward).parameters:
            kwargs["mm_token_type_ids"] = (ids == ref.config.image_token_id).int()[None]
    with torch.no_grad():
        out = ref.generate(**kwargs)
    return out[0, ids.numel():].tolist()


def naive_greedy(model, ids, pixels, grid, n):
    """Greedy decoding by recomputing model.logits over the whole sequence at every step."""
    toks = []
    for _ in range(n):
        with torch.no_grad():
            t = int(model.logits(torch.cat([ids, torch.tensor(toks, dtype=torch.long)]), pixels, grid)[-1].argmax())
        toks.append(t)
    return toks


def recomputed_logprobs(model, ids, pixels, grid, completion, temperature, top_k=0, top_p=1.0):
    """Log-prob of each completion token under logits/temperature filtered by top-k then top-p,
    from one dense forward of prompt + completion (an independent implementation of the filters)."""
    full = torch.cat([ids, torch.tensor(completion, dtype=torch.long)])
    with torch.no_grad():
        logits = model.logits(full, pixels, grid)[ids.numel() - 1:-1].double() / temperature
    out = []
    for row, tok in zip(logits, completion):
        p = row.softmax(-1)
        order = p.argsort(descending=True)
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order[:top_k or len(p)]] = True
        p = torch.where(keep, p, 0.0) / p[keep].sum()
        mass = 0.0
        for i in p.argsort(descending=True).tolist():
            if mass >= top_p:
                p[i] = 0.0
            mass += p[i].item()
        out.append(float((p[tok] / p.sum()).log()))
    return out
