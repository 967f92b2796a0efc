"""Our GPT2LMHeadModel as an lm-evaluation-harness model, registered as "gpt2-forge".

lm_eval owns everything about a benchmark (task registry, prompts, few-shot sampling, metrics, aggregation); a model
backend only answers three kinds of requests. `GPT2ForgeLM` answers them with our model and reproduces the numerics of
lm_eval's own `hf` backend (lm_eval/models/huggingface.py, HFLM, 0.4.x) so that a score is the same whichever backend
produced it:

  * loglikelihood: the context/continuation split of TemplateLM._encode_pair (trailing spaces of the context move to
    the continuation; the continuation's tokens are those of tokenize(context + continuation) after the context's),
    an empty context conditioned on the prefix token (BOS, else EOS), inputs cut from the left to n_positions + 1
    tokens, requests sorted longest first, and one row per group of requests that share context +
    continuation[:-1] (HFLM's logits cache, which multiple-choice tasks with one-token answers hit);
  * loglikelihood_rolling: lm_eval.utils.get_rolling_token_windows + make_disjoint_window with the prefix token and
    max_length = n_positions, context_len=1, so a document longer than n_positions is scored in sliding windows and
    every token is predicted once;
  * generate_until: contexts left-truncated to n_positions - max_gen_toks and left-padded, greedy (or sampled when
    the task asks) with our KV-cache `generate`, stopping at eos or when every row has produced a stop sequence,
    the text cut at the first stop sequence (lm_eval.models.utils.postprocess_generated_text).

What makes it faster than HFLM on the same model (benchmarks/eval_throughput.py): a context shared by several
continuations (the choices of a multiple-choice question) runs once, and each continuation runs on its cached keys
and values (HFLM feeds context + choice for every choice); the LM head and the softmax run only at the positions that
are scored, not at every position of the padded batch (HFLM log-softmaxes the whole (B, T, V) logits); each distinct
string is tokenized once in one Rust batch call; everything runs under torch.inference_mode; generation uses gpt2's
preallocated KV cache and stops each row at its first stop sequence.

Data parallel: launched with `torchrun --nproc-per-node=N` (or `accelerate launch`) and `distributed=True`, each
process scores the share of requests lm_eval's evaluator gives its rank, and the per-sample metrics are gathered on
rank 0 through torch.distributed (lm_eval's own all_gather / gather_object / barrier protocol). Our forward needs no
collective, so, unlike HFLM under DDP, no rank has to pad its requests to the others' count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

MODEL_NAME = "gpt2-forge"
# lm_eval's HFLM generates at most this many tokens when a task does not say (HFLM.max_gen_toks).
DEFAULT_MAX_GEN_TOKS = 256
# LM-head rows computed at once when scoring: bounds the (rows, vocab) fp32 logits to 2**25 floats (128 MiB),
# e.g. 667 positions of GPT-2's 50257-token vocabulary — a rolling window of 1024 scored tokens takes two chunks.
_LOGIT_BUDGET = 2**25
# generate() keys we pass through; lm_eval's normalize_gen_kwargs adds do_sample/temperature to every request.
_GEN_KWARGS = ("do_sample", "temperature", "top_k", "top_p")


# ------------------------------------------------------------------------------------------------ loading
def load_model(src: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, tokenizer, resolved_dir, run_dir) for an HF folder, a hub id (its snapshot in the huggingface_hub
    cache), a PEFT LoRA adapter folder (on the base its adapter_config.json names), a checkpoints/step-N folder or a
    run dir.

    A run dir resolves to its newest complete checkpoint, or to its `hf/` export when it holds no checkpoint;
    `run_dir` is the run the weights belong to (None for a standalone HF folder). Raises FileNotFoundError when
    `src` is neither a path nor a hub id that can be had, ValueError when the path is not a model or holds a
    fine-tuned head (GPT2ForSequenceClassification, ...) rather than a language model.
    """
    from gpt2 import GPT2LMHeadModel

    from train.checkpoint.export import load_model_and_tokenizer
    from train.checkpoint.layout import init_source

    p = init_source(str(src), label=str(src))  # FileNotFoundError: neither a path nor a hub id it could fetch
    if p.is_dir() and p.name == "checkpoints":
        p = p.parent
    run_dir: Optional[Path] = None
    hf_or_adapter = (p / "config.json").is_file() or (p / "adapter_config.json").is_file()
    if hf_or_adapter and not (p / "meta.json").is_file():  # an HF folder (a run's hf/ export) or a LoRA adapter/
        model, tok = load_model_and_tokenizer(p)
        if p.name in ("hf", "adapter") and (p.parent / "config.yaml").is_file():
            run_dir = p.parent
        return model.to(device).eval(), tok, p, run_dir
    # our checkpoints: train.checkpoint.io imports Lightning (seconds), so only on this path
    from train.checkpoint.layout import META_NAME, latest_checkpoint
    from train.checkpoint.export import load_for_export, not_a_language_model

    if (p / META_NAME).is_file():  # a checkpoint of ours
        step = p
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
    elif p.is_dir() and (step := latest_checkpoint(p)) is not None:  # a run dir with checkpoints
        run_dir = p
    elif p.is_dir() and (p / "hf" / "config.json").is_file():  # a run dir whose checkpoints are gone: its export
        model, tok = load_model_and_tokenizer(p / "hf")
        return model.to(device).eval(), tok, p / "hf", p
    else:
        raise ValueError(
            f"{p} is not a model: expected an HF folder (config.json + model.safetensors + tokenizer files), a "
            f"checkpoints/step-N folder, or a run dir holding checkpoints/ or hf/."
        )
    model, tok, step = load_for_export(step)
    if not isinstance(model, GPT2LMHeadModel):
        raise not_a_language_model(step, type(model).__name__)
    return model.to(device).eval(), tok, step, run_dir


# ------------------------------------------------------------------------------------------------ the model
@register_model(MODEL_NAME)
class GPT2ForgeLM(TemplateLM):
    """lm_eval model backed by a `gpt2.GPT2LMHeadModel` and a `gpt2.GPT2TokenizerFast`.

    Args:
        pretrained: a live GPT2LMHeadModel (used in place: its device and dtype are kept, and its train/eval mode is
            restored after every call), or a path that `load_model` resolves (HF folder, checkpoint, run dir).
        tokenizer: the GPT2TokenizerFast to use with a live model (or a tokenizer folder); a path `pretrained`
            brings its own.
        batch_size: requests per forward pass (int; lm_eval's "auto" is not supported).
        device: where a model loaded from a path goes ("cpu", "cuda", "cuda:1"; default cuda when available).
        max_length: the context window in tokens (default: the model's n_positions, as HFLM).
        max_gen_toks: tokens generated when a task gives no max_gen_toks (HFLM's 256).
        prefix_token_id: the token an empty context is conditioned on (default: BOS, else EOS, as HFLM).
        distributed: score this rank's share of the requests and gather results over the initialized
            torch.distributed process group (launch with torchrun / accelerate launch).
        show_progress: tqdm bars on rank 0.
    `simple_evaluate(model="gpt2-forge", model_args="pretrained=<dir>,batch_size=8")` builds one by name once this
    module is imported.
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        max_batch_size: Optional[int] = None,
        device: Optional[str] = None,
        max_length: Optional[int] = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        prefix_token_id: Optional[int] = None,
        distributed: bool = False,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        del max_batch_size  # only meaningful with batch_size="auto", which we do not support
        try:
            self._batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(
                f"batch_size={batch_size!r} is not supported by the {MODEL_NAME} backend; give a number."
            ) from None
        if self._batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        if isinstance(pretrained, (str, os.PathLike)):
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            pretrained, tokenizer, self.source, _ = load_model(pretrained, dev)
        else:
            self.source = None
            if tokenizer is None:
                raise ValueError("a live model needs its tokenizer: pass tokenizer=<GPT2TokenizerFast>.")
            if isinstance(tokenizer, (str, os.PathLike)):
                from gpt2 import GPT2TokenizerFast

                tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer)
        if not hasattr(pretrained, "lm_head") or not hasattr(pretrained, "transformer"):
            raise ValueError(f"{type(pretrained).__name__} is not a GPT2LMHeadModel; it cannot score text.")
        self._model = pretrained
        self.tokenizer = tokenizer
        self._device = next(pretrained.parameters()).device
        self._max_length = int(max_length or pretrained.config.n_positions)
        self._max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = prefix_token_id
        self.show_progress = show_progress
        if self.eot_token_id is None:
            raise ValueError("the tokenizer has no eos token; lm_eval needs one (GPT-2's is <|endoftext|>).")
        self._bos_text = tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
        if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank = torch.distributed.get_rank()
            self._world_size = torch.distributed.get_world_size()

    # -------------------------------------------------------------------------------------- what lm_eval reads
    @property
    def model(self):
        return self._model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """What simple_evaluate records under results["config"]."""
        return {
            "model_source": str(self.source) if self.source is not None else "in-memory",
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(next(self._model.parameters()).dtype),
        }

    # -------------------------------------------------------------------------------------- data parallel
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate `tensor` (a 0-d count or (n,)) from every rank along dim 0, as accelerate's gather."""
        if self.world_size <= 1:
            return tensor
        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list]:
        if self.world_size <= 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # -------------------------------------------------------------------------------------- tokenizing
    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None, **kw):
        """Token ids of `string`: the tokenizer's own special-token setting, except that a string starting with the
        prefix (BOS) text gets none added (HFLM.tok_encode)."""
        ids = self._encode_many([string], add_special_tokens)[string]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode_many(self, strings: Iterable[str], add_special_tokens: Optional[bool] = None) -> dict[str, list[int]]:
        """{string: ids} for every distinct string, tokenized in one Rust batch call per special-token setting."""
        unique = list(dict.fromkeys(strings))
        if add_special_tokens is not None:
            by_flag = {add_special_tokens: unique}
        else:  # HFLM: add_special_tokens=False when the text already starts with the BOS text, else the default
            by_flag = {False: [s for s in unique if s.startswith(self._bos_text)],
                       True: [s for s in unique if not s.startswith(self._bos_text)]}
        out: dict[str, list[int]] = {}
        for flag, texts in by_flag.items():
            if texts:
                out.update(zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=flag)))
        return out

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -------------------------------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is the greedy decoding) per request.

        The token split is TemplateLM.loglikelihood's, done over all requests with each distinct string
        tokenized once.
        """
        pairs = [req.args for req in requests]
        moved = []  # (context, continuation) after TemplateLM._encode_pair moves the context's trailing spaces
        for context, continuation in pairs:
            n_spaces = len(context) - len(context.rstrip())
            moved.append((context[:-n_spaces], context[-n_spaces:] + continuation) if n_spaces else
                         (context, continuation))
        enc = self._encode_many([c for c, _ in moved if c] + [c + x for c, x in moved if c])
        bare = self._encode_many([x for (c, _), (_, x) in zip(pairs, moved) if not c], add_special_tokens=False)
        new_reqs = []
        for (context, continuation), (ctx, cont) in zip(pairs, moved):
            if context == "":  # condition on the prefix token (BOS/EOS) unless the continuation starts with it
                cont_enc = bare[continuation]
                ctx_enc, cont_enc = (([self.prefix_token_id], cont_enc) if self.prefix_token_id != cont_enc[0]
                                     else (cont_enc[:1], cont_enc[1:]))
            else:
                ctx_enc = enc[ctx]
                cont_enc = enc[ctx + cont][len(ctx_enc):]
            new_reqs.append(((context, continuation), ctx_enc, cont_enc))
        return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(document) per request, every token predicted once: the first window is conditioned on the prefix
        token, each later window on the max_length - (its new tokens) tokens before it (HFLM, context_len=1)."""
        strings = [req.args[0] for req in requests]
        enc = self._encode_many(strings)
        windows, owner = [], []
        for i, s in enumerate(strings):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=enc[s], prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(strings)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for s, total in zip(strings, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (s,), total)
        return totals

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """Score (key, context_ids, continuation_ids) requests; returns (logprob, is_greedy) in request order.

        Requests whose context is shared by two or more different continuations (the choices of a multiple-choice
        question) run the context once and each continuation on its cached keys/values (`_score_shared`); the rest
        run HFLM's way, one row per request (`_score_rows`). Same scores either way, up to float rounding.
        """
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("a loglikelihood request has an empty context or continuation after tokenization; "
                                 "check the task's doc_to_text / doc_to_target.")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's "
                                 f"{self.max_length}-token window; shorten the task's target.")
        by_ctx: dict[tuple, list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if len(ctx) + len(cont) <= self.max_length + 1:  # not truncated: the context is the input's prefix
                by_ctx.setdefault(tuple(ctx), []).append(i)
        shared = [idx for idx in by_ctx.values() if len({tuple(requests[i][2][:-1]) for i in idx}) > 1]
        in_shared = {i for idx in shared for i in idx}
        rest = [i for i in range(len(requests)) if i not in in_shared]

        logprob = torch.zeros(len(requests), dtype=torch.float64)
        mismatches = torch.zeros(len(requests), dtype=torch.long)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.show_progress or self.rank != 0,
                   desc="loglikelihood requests")
        with self._inference():
            for units in self._shared_batches(shared, requests):
                self._score_shared(units, requests, logprob, mismatches)
                bar.update(sum(len(idx) for _, idx in units))
            groups, order = self._row_groups(rest, requests)
            for b in range(0, len(order), self.batch_size):
                keys = order[b: b + self.batch_size]
                self._score_rows(keys, groups, requests, logprob, mismatches)
                bar.update(sum(len(groups[k]) for k in keys))
        bar.close()
        out = []
        for (key, _, _), lp, mm in zip(requests, logprob.tolist(), mismatches.tolist()):
            answer = (lp, mm == 0)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def _row_groups(self, indices: list[int], requests) -> tuple[dict[tuple, list[int]], list[tuple]]:
        """HFLM's batching: requests sharing context + continuation[:-1] have the same input (the last continuation
        token is never fed in) and differ only in the scored suffix, so one row serves the group (HFLM's logits
        cache); groups are ordered as HFLM orders them (longest first, then by tokens)."""
        groups: dict[tuple, list[int]] = {}
        for i in indices:
            _, ctx, cont = requests[i]
            groups.setdefault(tuple(ctx + cont[:-1]), []).append(i)
        rep = {key: max(members, key=lambda i: len(requests[i][2])) for key, members in groups.items()}
        order = sorted(groups, key=lambda k: (-(len(k) + 1), k + (requests[rep[k]][2][-1],)))
        return groups, order

    def _score_rows(self, keys, groups, requests, logprob: torch.Tensor, mismatches: torch.Tensor) -> None:
        """One forward over the row groups `keys`; adds each member's log-probs and greedy misses into the outputs."""
        inputs = [list(k[-self.max_length:]) for k in keys]  # HFLM: (ctx + cont)[-(max_length + 1):][:-1]
        T = max(len(x) for x in inputs)
        x = torch.zeros((len(inputs), T), dtype=torch.long)  # right padding: causal attention never sees it
        for r, ids in enumerate(inputs):
            x[r, : len(ids)] = torch.tensor(ids)
        h = self._model.transformer(x.to(self._device)).last_hidden_state  # (B, T, C)
        # the scored positions: the last len(cont) of each row's input, for the group's longest continuation
        rows, cols, pairs = [], [], []  # pairs: (flat position, target token, request)
        for r, (key, ids) in enumerate(zip(keys, inputs)):
            width = max(len(requests[i][2]) for i in groups[key])
            for i in groups[key]:
                cont = requests[i][2]
                start = len(rows) + width - len(cont)
                pairs += [(start + j, t, i) for j, t in enumerate(cont)]
            rows += [r] * width
            cols += range(len(ids) - width, len(ids))
        hs = h[torch.tensor(rows, device=h.device), torch.tensor(cols, device=h.device)]  # (N, C)
        self._score_positions(hs, pairs, logprob, mismatches)

    def _shared_batches(self, shared: list[list[int]], requests):
        """Batches of (context, request indices) units holding at most batch_size continuations, longest first."""
        units = []
        for idx in shared:
            idx = sorted(idx, key=lambda i: -len(requests[i][2]))
            units += [(requests[idx[0]][1], idx[k: k + self.batch_size]) for k in range(0, len(idx), self.batch_size)]
        units.sort(key=lambda u: -(len(u[0]) + len(requests[u[1][0]][2])))
        batch, n = [], 0
        for unit in units:
            if batch and n + len(unit[1]) > self.batch_size:
                yield batch
                batch, n = [], 0
            batch.append(unit)
            n += len(unit[1])
        if batch:
            yield batch

    def _score_shared(self, units, requests, logprob: torch.Tensor, mismatches: torch.Tensor) -> None:
        """Contexts once (with their keys/values kept), then every distinct continuation[:-1] of each on its
        context's cache: a 4-choice question with a 60-token context and 20-token endings feeds 140 tokens, not 320.

        The first continuation token is scored at the context's last position; the others at the continuation
        rows' positions. Continuation rows see the context through an attention mask that hides the context batch's
        right padding, with positions counted from the mask (so a row continues at its own context length).
        """
        dev = self._device
        ctxs = [list(ctx) for ctx, _ in units]
        Tc = max(len(c) for c in ctxs)
        xc = torch.zeros((len(ctxs), Tc), dtype=torch.long)
        for u, ctx in enumerate(ctxs):
            xc[u, : len(ctx)] = torch.tensor(ctx)
        out = self._model.transformer(xc.to(dev), use_cache=True)
        ctx_last = out.last_hidden_state[torch.arange(len(ctxs), device=dev),
                                         torch.tensor([len(c) - 1 for c in ctxs], device=dev)]  # (U, C)
        row_of: dict[tuple, int] = {}
        rows: list[tuple[int, list[int]]] = []  # (unit, continuation[:-1]) fed on the unit's cache
        for u, (_, idx) in enumerate(units):
            for i in idx:
                cont = requests[i][2]
                if len(cont) > 1 and (u, tuple(cont[:-1])) not in row_of:
                    row_of[(u, tuple(cont[:-1]))] = len(rows)
                    rows.append((u, cont[:-1]))
        hs, row_start = ctx_last, []
        if rows:
            Tu = max(len(t) for _, t in rows)
            xu = torch.zeros((len(rows), Tu), dtype=torch.long)
            mask = torch.zeros((len(rows), Tc + Tu), dtype=torch.long)
            for r, (u, toks) in enumerate(rows):
                xu[r, : len(toks)] = torch.tensor(toks)
                mask[r, : len(ctxs[u])] = 1  # the context's real tokens, not the context batch's padding
                mask[r, Tc: Tc + len(toks)] = 1
            unit = torch.tensor([u for u, _ in rows], device=dev)
            past = tuple((k.index_select(0, unit), v.index_select(0, unit)) for k, v in out.past_key_values)
            hu = self._model.transformer(xu.to(dev), past_key_values=past, attention_mask=mask.to(dev)
                                         ).last_hidden_state  # (R, Tu, C)
            hs = torch.cat([ctx_last, hu[mask[:, Tc:].bool().to(dev)]])  # (U + real continuation tokens, C)
            lengths = [len(t) for _, t in rows]
            row_start = [len(ctxs) + sum(lengths[:r]) for r in range(len(rows))]
        pairs = []
        for u, (_, idx) in enumerate(units):
            for i in idx:
                cont = requests[i][2]
                pairs.append((u, cont[0], i))
                if len(cont) > 1:
                    start = row_start[row_of[(u, tuple(cont[:-1]))]]
                    pairs += [(start + j, t, i) for j, t in enumerate(cont[1:])]
        self._score_positions(hs, pairs, logprob, mismatches)

    def _score_positions(self, hs: torch.Tensor, pairs, logprob: torch.Tensor, mismatches: torch.Tensor) -> None:
        """LM head + log-softmax at the N hidden states `hs` (N, C) only, in row chunks that bound the (rows, V)
        logits; each (position, target, request) pair adds log p(target) and a greedy miss to its request."""
        n = hs.size(0)
        pos = torch.tensor([p for p, _, _ in pairs], device=hs.device)
        tok = torch.tensor([t for _, t, _ in pairs], device=hs.device)
        lse = torch.empty(n, dtype=torch.float32, device=hs.device)
        greedy = torch.empty(n, dtype=torch.long, device=hs.device)
        target = torch.empty(len(pairs), dtype=torch.float32, device=hs.device)
        step = max(1, _LOGIT_BUDGET // self._model.lm_head.weight.size(0))
        for s in range(0, n, step):
            logits = self._model.lm_head(hs[s: s + step]).float()  # (rows, V)
            lse[s: s + step] = torch.logsumexp(logits, dim=-1)
            greedy[s: s + step] = logits.argmax(dim=-1)
            sel = ((pos >= s) & (pos < s + step)).nonzero().squeeze(1)
            target[sel] = logits[pos[sel] - s, tok[sel]]
        req = torch.tensor([i for _, _, i in pairs])
        logprob.index_add_(0, req, (target - lse[pos]).double().cpu())  # log_softmax(logits)[target], as HFLM
        mismatches.index_add_(0, req, (greedy[pos] != tok).long().cpu())

    # -------------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, when the task sets do_sample, sampled) continuations cut at the first stop sequence."""
        args = [req.args for req in requests]
        enc = self._encode_many([ctx for ctx, _ in args])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        # HFLM's order: grouped by generation kwargs, longest context first
        re_ord = Collator(args, sort_fn=lambda r: (-len(enc[r[0]]), r[0]), group_by="gen_kwargs",
                          group_fn=lambda r: r[1])
        bar = tqdm(total=len(args), disable=disable_tqdm or not self.show_progress or self.rank != 0,
                   desc="generate_until requests")
        res = []
        with self._inference():
            for chunk in re_ord.get_batched(n=self.batch_size):
                contexts, all_kwargs = zip(*chunk)
                for text in self._generate_batch(contexts, all_kwargs[0], enc, eos_text):
                    res.append(text)
                    bar.update(1)
        bar.close()
        res = re_ord.get_original(res)
        for (context, gen_kwargs), text in zip(args, res):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return res

    def _generate_batch(self, contexts, gen_kwargs: dict, enc: dict[str, list[int]], eos_text: str) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = kwargs.pop("max_gen_toks")
        max_ctx_len = self.max_length - max_gen_toks
        if max_ctx_len <= 0:
            raise ValueError(f"the task asks for max_gen_toks={max_gen_toks}, which leaves no room for a prompt "
                                  f"in the model's {self.max_length}-token window; lower max_gen_toks.")
        rows = [enc[c][-max_ctx_len:] for c in contexts]  # HFLM left-truncates the contexts to max_ctx_len
        T = max(len(r) for r in rows)
        max_new = kwargs.pop("max_length", T + max_gen_toks) - T  # HFLM: max_length = T + max_gen_toks
        unknown = sorted(set(kwargs) - set(_GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation_kwargs {unknown} are not supported by the {MODEL_NAME} backend "
                                  f"(it takes until, max_gen_toks, {', '.join(_GEN_KWARGS)}); remove them.")
        do_sample = bool(kwargs.get("do_sample"))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, toks in enumerate(rows):  # left padding: every row's last prompt token sits at T - 1
            if toks:
                ids[r, T - len(toks):] = torch.tensor(toks)
                mask[r, T - len(toks):] = 1
        out = self._model.generate(
            ids.to(self._device), attention_mask=mask.to(self._device), max_new_tokens=max_new, do_sample=do_sample,
            temperature=float(kwargs.get("temperature") or 1.0) if do_sample else 1.0,
            top_k=kwargs.get("top_k") if do_sample else None, top_p=kwargs.get("top_p") if do_sample else None,
            eos_token_id=self.eot_token_id, pad_token_id=pad,
            stopping_criteria=[_StopSequences(self.tokenizer, until, T)],
        )
        texts = self.tokenizer.batch_decode(out[:, T:].tolist(), skip_special_tokens=True)
        return [postprocess_generated_text(t, until, None) for t in texts]

    # -------------------------------------------------------------------------------------- helpers
    def _inference(self):
        return _InferenceMode(self._model)


class _StopSequences:
    """Stopping criterion for gpt2 `generate`: a row is done once its generated text contains a stop sequence.

    HFLM's MultiTokenEOSCriteria decodes only the last len(stop tokens) + 2 tokens and stops when every row has
    produced one and the same stop sequence; the text is cut at the first stop sequence afterwards either way, so
    stopping each row at its first one yields the same strings with fewer generated tokens.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len
        self.done: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.size(0), dtype=torch.bool)
        todo = (~self.done).nonzero().squeeze(1).tolist()
        texts = self.tokenizer.batch_decode(input_ids[todo, self.prompt_len:].tolist(), skip_special_tokens=False)
        for r, text in zip(todo, texts):
            self.done[r] = any(s in text for s in self.stops)
        return self.done.to(input_ids.device)


class _InferenceMode:
    """eval() + torch.inference_mode for the duration of a request batch; the model's train/eval mode is restored
    (the training loop hands us its live model)."""

    def __init__(self, model):
        self.model, self.mode = model, torch.inference_mode()

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.model.train(self.was_training)
        return False
