"""KV caches: the growing tuple cache of transformers' forward (`DynamicKVCache`) and generation's preallocated one
(`StaticKVCache`).

Both have one interface, so attention never asks which it holds: `update(layer_idx, k, v)` stores the new keys/values
and returns the layer's keys/values so far; `length` is the number of positions cached before this forward (a Python
int), advanced by the trunk once every layer has written. Their own module so that the model (gpt2/modeling.py, which
writes them inside attention), its transformers surface (gpt2/compat.py) and the decode loop (gpt2/generation.py) all
import them from below.
"""

from __future__ import annotations

import torch

from .config import GPT2Config


class DynamicKVCache:
    """transformers' tuple cache behind the common interface: `past_key_values` = ((k, v), ...) per layer.

    Each layer's past is concatenated with the new positions (torch.cat; O(T) copies per token, which is why
    generate() uses StaticKVCache), and `to_tuple()` gives the ((k, v), ...) that the forward returns as
    `past_key_values`. An empty past collects the keys/values of a first forward with use_cache=True.
    """

    def __init__(self, past: tuple | list = ()):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [tuple(kv) for kv in past]
        self.length = self.layers[0][0].size(-2) if self.layers else 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k, v (B, nh, T, hs) to layer `layer_idx`'s past; return (B, nh, T_past + T, hs) each."""
        if layer_idx < len(self.layers):
            past_k, past_v = self.layers[layer_idx]
            k = torch.cat((past_k, k), dim=-2)  # (B, nh, T_past + T, hs)
            v = torch.cat((past_v, v), dim=-2)
            self.layers[layer_idx] = (k, v)
        else:
            self.layers.append((k, v))
        return k, v

    def to_tuple(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(self.layers)

    def get_seq_length(self) -> int:
        return self.length


class StaticKVCache:
    """Preallocated keys/values, (B, nh, max_len, hs) per layer, written in place as tokens arrive.

    The tuple cache (`past_key_values` = ((k, v), ...)) concatenates each layer's whole past every step — O(T) copies
    per token; this one writes only the new positions (slice assignment) and hands attention a view of the filled
    part, like transformers' StaticCache / gpt-fast's KVCache. `length` is a Python int, so reading it never syncs
    with the device. Indexing gives the tuple view, so code written for the tuple cache reads it unchanged:
    `cache[i]` -> (k, v) of layer i, each (B, nh, length, hs). Pass it as `past_key_values`; the forward advances
    `length` by the number of input tokens and returns the same object as `past_key_values`.
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_len: int):
        if max_len > config.n_positions:
            raise ValueError(f"StaticKVCache max_len={max_len} exceeds n_positions={config.n_positions}.")
        self.shape = (batch_size, config.n_head, max_len, config.head_dim)  # (B, nh, max_len, hs)
        # Allocated at the first write, with that k/v's device and dtype (under autocast k/v are bf16/fp16).
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.max_len, self.length = max_len, 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, nh, T, hs) at [length, length + T); return views of positions [0, length + T)."""
        end = self.length + k.size(-2)
        if end > self.max_len:
            raise ValueError(f"StaticKVCache is full: {end} positions needed, max_len={self.max_len}.")
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = k.new_zeros(self.shape)
            self.values[layer_idx] = v.new_zeros(self.shape)
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        kb[:, :, self.length:end] = k
        vb[:, :, self.length:end] = v
        return kb[:, :, :end], vb[:, :, :end]  # (B, nh, T_past + T, hs)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[i] is None:
            raise IndexError("StaticKVCache is empty until the first forward that uses it.")
        return self.keys[i][:, :, : self.length], self.values[i][:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length


__all__ = ["DynamicKVCache", "StaticKVCache"]
