"""transformers' surface of the GPT-2 classes, around the core forwards of gpt2/modeling.py.

What lives here exists so that code written for transformers' GPT-2 runs unchanged on ours:
  * the output classes (ModelOutput and friends: `out.logits`, `out["logits"]`, `out[0]`) and `return_dict=False`;
  * `forward` with transformers' keyword arguments for each class (mixins the model classes inherit): the argument
    aliases (`cache` / `past_key_values`), extra leading dims (GPT2DoubleHeadsModel's (B, n_choices, T)), the tuple
    KV cache, output_hidden_states / output_attentions, one-sentence errors for out-of-range ids, and what each
    head computes from the trunk's output (pooling, losses), as transformers computes it;
  * PreTrainedAPI: resize_token_embeddings, get/set_input_embeddings, device, dtype, num_parameters,
    gradient_checkpointing_enable (from_pretrained / save_pretrained: gpt2/hf_io.py's PretrainedIO).
References: transformers 5.24 models/gpt2/modeling_gpt2.py, modeling_outputs.py, modeling_utils.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import DynamicKVCache, StaticKVCache

# ----------------------------------------------------------------------------------------------------------------
# Outputs: dataclasses with HF's field names; `out["logits"]` and `out[0]` work like transformers' ModelOutput.


class ModelOutput:
    @property
    def cache(self):
        """transformers 5.24's name for past_key_values."""
        return getattr(self, "past_key_values", None)

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class GPT2ModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple | None = None  # () with output_attentions (GPT-2 has no cross-attention), as transformers


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    # () with output_attentions, as transformers' CausalLMOutputWithCrossAttentions
    cross_attentions: tuple | None = None


@dataclass
class GPT2DoubleHeadsModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    mc_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mc_logits: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def returned(out: ModelOutput, return_dict: bool | None):
    """return_dict=False gives the tuple of the set fields, as in transformers."""
    return out.to_tuple() if return_dict is False else out


# ----------------------------------------------------------------------------------------------------------------
# Inputs: transformers' arguments -> the core forward's


def check_ids(ids: torch.Tensor, name: str, size: int, what: str) -> None:
    """One sentence naming an id outside [0, size) instead of the embedding's bare "IndexError: index out of range".

    Only for CPU tensors, where min/max is a cheap host computation: on an accelerator reading the result back would
    stall the launch queue every step (a host sync), so there the embedding's own device-side assert reports it.
    """
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= size:
        bad = hi if hi >= size else lo
        fix = ("resize the model with model.resize_token_embeddings(len(tokenizer)) after adding tokens, or use the "
               "tokenizer the model was trained with") if what == "tokens" else "keep positions below n_positions"
        raise ValueError(f"{name} holds the id {bad}, but the model has {size} {what} (ids 0 to {size - 1}); {fix}.")


def _past(past_key_values, cache):
    """transformers 5.24 names the forward's cache argument `cache` (past_key_values is its deprecated alias): take
    either. Only caches this model made are understood (a tuple of (k, v) per layer, or generate's StaticKVCache)."""
    if cache is not None:
        if past_key_values is not None:
            raise ValueError("pass the cache once: cache or past_key_values, not both.")
        past_key_values = cache
    if past_key_values is not None and not isinstance(past_key_values, (tuple, list, StaticKVCache)):
        raise ValueError(f"past_key_values/cache must be the .past_key_values an earlier forward of this model "
                         f"returned (a tuple of (key, value) per layer), got {type(past_key_values).__name__}.")
    return past_key_values


class TrunkCall:
    """One call of the trunk with transformers' arguments: `core_kwargs` for GPT2Model.core_forward (ids flattened to
    (B, T), ids checked, the KV cache object), and the results back in transformers' shapes and types."""

    def __init__(self, trunk, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                 position_ids=None, inputs_embeds=None, use_cache=None, output_attentions=False,
                 output_hidden_states=False, cache=None, encoder_hidden_states=None, encoder_attention_mask=None):
        past = _past(past_key_values, cache)
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            raise ValueError("encoder_hidden_states / encoder_attention_mask feed cross-attention (add_cross_attention"
                             "=True), which gpt2-forge's GPT-2 does not have; drop them.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds.")
        # Inputs may have extra leading dims (GPT2DoubleHeadsModel: (B, n_choices, T)); flatten them into the batch.
        self.shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        T = self.shape[-1]
        input_ids, token_type_ids, position_ids = (None if t is None else t.reshape(-1, T)
                                                   for t in (input_ids, token_type_ids, position_ids))
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds.reshape(-1, T, inputs_embeds.size(-1))  # (B, T, C)
        vocab = trunk.wte.num_embeddings
        for ids, name, size, what in ((input_ids, "input_ids", vocab, "tokens"),
                                      (token_type_ids, "token_type_ids", vocab, "tokens"),
                                      (position_ids, "position_ids", trunk.config.n_positions, "positions")):
            if ids is not None:
                check_ids(ids, name, size, what)
        if attention_mask is not None:
            B = input_ids.size(0) if input_ids is not None else inputs_embeds.size(0)
            attention_mask = attention_mask.reshape(B, -1)  # (B, T_past + T)
        if use_cache is None:
            use_cache = trunk.config.use_cache and not trunk.training
        if trunk.gradient_checkpointing and trunk.training:
            use_cache = False  # recomputed blocks cannot hand out their keys/values
        if not isinstance(past, StaticKVCache) and (past is not None or use_cache):
            past = DynamicKVCache(past or ())  # the tuple cache, read and extended through the common interface
        self.use_cache, self.kv = use_cache, past
        self.hidden_states = [] if output_hidden_states else None
        self.attentions = [] if output_attentions else None
        self.core_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, cache=past,
                                position_ids=position_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,
                                hidden_states=self.hidden_states, attentions=self.attentions)

    def unflatten(self, t: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (*leading dims of the input, ...): undo the flattening of extra leading dims."""
        return t.view(*self.shape[:-1], *t.shape[1:])

    def outputs(self) -> dict:
        """past_key_values, hidden_states, attentions as transformers returns them (None when not asked for)."""
        past = None
        if self.use_cache:
            past = self.kv if isinstance(self.kv, StaticKVCache) else self.kv.to_tuple()
        hidden = None if self.hidden_states is None else tuple(self.unflatten(h) for h in self.hidden_states)
        att = None if self.attentions is None else tuple(self.attentions)
        return dict(past_key_values=past, hidden_states=hidden, attentions=att)

    def run(self, trunk) -> torch.Tensor:
        """The trunk's last hidden state, in the input's leading dims: (..., T, C)."""
        return self.unflatten(trunk.core_forward(**self.core_kwargs))


# ----------------------------------------------------------------------------------------------------------------
# Losses as transformers computes them (loss_utils.py, and the heads' forwards)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy of logits (..., T, V) against labels (..., T), -100 ignored: ForCausalLMLoss."""
    # Shift the labels left (pad with -100) rather than slicing the logits: same loss, no copy of the (B, T, V) logits
    # (transformers' ForCausalLMLoss). Loss in fp32 even when the logits are bf16. With num_items_in_batch (gradient
    # accumulation over uneven batches), the sum over tokens divided by it, as there.
    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=-100, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _classification_loss(pooled, labels, num_labels, problem):
    """transformers' GPT2ForSequenceClassification loss: the problem type inferred from the labels when not set."""
    if labels is None:
        return None
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return F.mse_loss(pooled.squeeze(), labels.squeeze()) if num_labels == 1 else F.mse_loss(pooled, labels)
    if problem == "single_label_classification":
        return F.cross_entropy(pooled.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(pooled, labels)


# ----------------------------------------------------------------------------------------------------------------
# forward with transformers' signature, one mixin per class (gpt2/modeling.py's classes inherit them)


class GPT2ModelForward:
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, use_cache=None, output_attentions=False,
                output_hidden_states=False, *, cache=None, encoder_hidden_states=None, encoder_attention_mask=None,
                return_dict=None) -> GPT2ModelOutput:
        call = TrunkCall(self, input_ids, past_key_values, attention_mask, token_type_ids, position_ids, inputs_embeds,
                         use_cache, output_attentions, output_hidden_states, cache, encoder_hidden_states,
                         encoder_attention_mask)
        x = call.run(self)
        return returned(GPT2ModelOutput(last_hidden_state=x, **call.outputs(),
                                        cross_attentions=() if output_attentions else None), return_dict)


class LMHeadForward:
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                output_hidden_states=False, logits_to_keep: int | torch.Tensor = 0, *, cache=None,
                encoder_hidden_states=None, encoder_attention_mask=None, num_items_in_batch=None,
                skip_logits=None, return_dict=None) -> CausalLMOutput:
        """Logits (B, T, V) and, with labels (B, T), the next-token cross-entropy (labels shifted inside, -100
        ignored; mean over tokens, or summed / num_items_in_batch as transformers' ForCausalLMLoss). logits_to_keep:
        an int keeps the last n positions (0 = all), a 1-D tensor the positions it lists.

        skip_logits (Liger-Kernel's argument): True computes the loss chunk by chunk without the full logits and
        returns logits=None; None (the default) does so when labels are given and config.loss_chunk_size > 0 (0,
        the default of GPT2Config, keeps transformers' behaviour); False always returns the logits."""
        call = TrunkCall(self.transformer, input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                         inputs_embeds, use_cache, output_attentions, output_hidden_states, cache,
                         encoder_hidden_states, encoder_attention_mask)
        logits, loss = self.core_forward(**call.core_kwargs, labels=labels, logits_to_keep=logits_to_keep,
                                         num_items_in_batch=num_items_in_batch, skip_logits=skip_logits)
        logits = call.unflatten(logits) if logits is not None else None
        return returned(CausalLMOutput(loss, logits, **call.outputs(),
                                       cross_attentions=() if output_attentions else None), return_dict)


class DoubleHeadsForward:
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, mc_token_ids=None, labels=None, mc_labels=None,
                use_cache=None, output_attentions=False, output_hidden_states=False, *, cache=None,
                return_dict=None) -> GPT2DoubleHeadsModelOutput:
        call = TrunkCall(self.transformer, input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                         inputs_embeds, use_cache, output_attentions, output_hidden_states, cache)
        h = call.run(self.transformer)  # (B, n_choices, T, C)
        lm_logits = self.lm_head(h)  # (B, n_choices, T, V)
        mc_logits = self.multiple_choice_head(h, mc_token_ids).squeeze(-1)  # (B, n_choices)
        mc_loss = None
        if mc_labels is not None:
            mc_loss = F.cross_entropy(mc_logits.view(-1, mc_logits.size(-1)), mc_labels.view(-1))
        lm_loss_ = lm_loss(lm_logits, labels) if labels is not None else None
        return returned(GPT2DoubleHeadsModelOutput(lm_loss_, mc_loss, lm_logits, mc_logits, **call.outputs()),
                        return_dict)




class SequenceClassificationForward:
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                output_hidden_states=False, *, cache=None, return_dict=None) -> SequenceClassifierOutput:
        call = TrunkCall(self.transformer, input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                         inputs_embeds, use_cache, output_attentions, output_hidden_states, cache)
        logits = self.score(call.run(self.transformer))  # (B, T, num_labels)
        B, T = logits.shape[:2]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("GPT2ForSequenceClassification needs config.pad_token_id to find the last token of "
                             "padded sequences in a batch > 1; set pad_token_id (e.g. to the tokenizer's eos id).")
        if pad is None or input_ids is None:
            last = torch.full((B,), T - 1, device=logits.device)
        else:
            # rightmost token != pad: correct for right padding (last real token) and left padding (position T-1)
            not_pad = (input_ids != pad).to(torch.int32)
            last = (torch.arange(T, device=logits.device, dtype=torch.int32) * not_pad).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)
        loss = _classification_loss(pooled, labels, self.num_labels, self.config.problem_type)
        return returned(SequenceClassifierOutput(loss, pooled, **call.outputs()), return_dict)


class TokenClassificationForward:
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                output_hidden_states=False, *, cache=None, return_dict=None) -> TokenClassifierOutput:
        call = TrunkCall(self.transformer, input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                         inputs_embeds, use_cache, output_attentions, output_hidden_states, cache)
        logits = self.classifier(self.dropout(call.run(self.transformer)))  # (B, T, num_labels)
        loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1)) if labels is not None else None
        out = call.outputs()
        return returned(TokenClassifierOutput(loss, logits, out["hidden_states"], out["attentions"]), return_dict)


class QuestionAnsweringForward:
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=False,
                output_hidden_states=False, *, return_dict=None) -> QuestionAnsweringModelOutput:
        call = TrunkCall(self.transformer, input_ids, None, attention_mask, token_type_ids, position_ids,
                         inputs_embeds, False, output_attentions, output_hidden_states)
        start_logits, end_logits = self.qa_outputs(call.run(self.transformer)).unbind(-1)  # 2 x (B, T)
        loss = None
        if start_positions is not None and end_positions is not None:
            # positions outside the input are clamped to T and ignored, as in transformers
            T = start_logits.size(1)
            start = start_positions.reshape(-1).clamp(0, T)
            end = end_positions.reshape(-1).clamp(0, T)
            loss = (F.cross_entropy(start_logits, start, ignore_index=T)
                    + F.cross_entropy(end_logits, end, ignore_index=T)) / 2
        out = call.outputs()
        return returned(QuestionAnsweringModelOutput(loss, start_logits, end_logits, out["hidden_states"],
                                                     out["attentions"]), return_dict)


# ----------------------------------------------------------------------------------------------------------------
# PreTrainedAPI: the rest of transformers' PreTrainedModel that GPT-2 users call

class PreTrainedAPI:
    """Mixed into GPT2PreTrainedModel; `self.transformer` is the trunk (GPT2Model itself for the bare trunk)."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear | None:
        """The lm_head (LM and double-heads models), None for the trunk and the classification heads."""
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the token embedding (V, C) -> (new_num_tokens, C), e.g. to len(tokenizer) after adding tokens.

        transformers 5.24's PreTrainedModel.resize_token_embeddings, step for step and with the same random draws, so
        a fixed seed gives the same new rows: rows [0, min(V, new)) are kept; new rows come, with mean_resizing=True
        (the default), from a normal with the old rows' mean and 1e-9 x their covariance (Hewitt 2021,
        https://nlp.stanford.edu/~johnhew/vocab-expansion.html: new tokens start near the average token, so the LM's
        next-token distribution barely moves; the mean itself when that covariance is not positive definite), else
        from N(0, initializer_range). pad_to_multiple_of rounds the size up (Tensor Cores like multiples of 64).
        A tied lm_head follows (it is the same tensor); an untied one is resized the same way. config.vocab_size is
        updated. new_num_tokens=None and pad_to_multiple_of=None: nothing changes. Returns the input embedding.
        Call it before wrapping the model for FSDP / DeepSpeed (it resizes plain tensors).
        """
        old = self.get_input_embeddings()
        if pad_to_multiple_of is not None:
            if (isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int)
                    or pad_to_multiple_of < 1):
                raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
            if new_num_tokens is None:
                new_num_tokens = old.weight.shape[0]
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return old
        if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be a positive int (e.g. len(tokenizer)), got {new_num_tokens!r}")
        old_n = old.weight.shape[0]
        if new_num_tokens != old_n:
            # As transformers: a new nn.Embedding (its own default init draws from the RNG too), new rows initialised,
            # old rows copied, and the data swapped into the existing Parameter, so a tied lm_head (the same
            # Parameter) has the new rows as well.
            new = nn.Embedding(new_num_tokens, old.weight.shape[1], device=old.weight.device, dtype=old.weight.dtype)
            self._init_new_rows(old.weight, new.weight, mean_resizing)
            n = min(old_n, new_num_tokens)
            new.weight.data[:n] = old.weight.data[:n]
            old.weight.data = new.weight.data
            old.num_embeddings = new_num_tokens
        head = self.get_output_embeddings()
        if head is not None:
            if head.weight.shape[0] != new_num_tokens:  # untied: a new Linear, initialised like the embedding
                new_head = nn.Linear(head.in_features, new_num_tokens, bias=head.bias is not None,
                                     device=head.weight.device, dtype=head.weight.dtype)
                self._init_new_rows(head.weight, new_head.weight, mean_resizing)
                n = min(head.weight.shape[0], new_num_tokens)
                new_head.weight.data[:n] = head.weight.data[:n]
                new_head.requires_grad_(head.weight.requires_grad)
                self.set_output_embeddings(new_head)
            else:
                head.out_features = new_num_tokens
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return self.get_input_embeddings()

    def _init_new_rows(self, old_weight: torch.Tensor, new_weight: torch.Tensor, mean_resizing: bool) -> None:
        """The rows of new_weight past old_weight's: transformers' _init_added_embeddings_weights_with_mean, or
        _init_weights' N(0, initializer_range) over the whole new tensor (the kept rows are copied over after)."""
        old_n, added = old_weight.shape[0], new_weight.shape[0] - old_weight.shape[0]
        if added <= 0:
            return
        if not mean_resizing:
            nn.init.normal_(new_weight, mean=0.0, std=self.config.initializer_range)
            return
        w = old_weight.data.to(torch.float32)
        mean = w.mean(dim=0)
        centered = w - mean
        covariance = centered.T @ centered / old_n  # (C, C)
        epsilon = 1e-9
        if torch.distributions.constraints.positive_definite.check(epsilon * covariance).all():
            dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=epsilon * covariance)
            new_weight.data[-added:] = dist.sample(sample_shape=(added,)).to(old_weight.dtype)
        else:
            new_weight.data[-added:] = mean[None, :].repeat(added, 1).to(old_weight.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied lm_head counts once); exclude_embeddings drops wte and wpe."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.transformer.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.transformer.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.transformer.gradient_checkpointing
