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
