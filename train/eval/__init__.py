"""Evaluation: evaluate.py (lm-evaluation-harness tasks scored with our model, standalone and during training:
`HarnessEval`), harness.py (our lm_eval backend), samples.py (samples.txt of an LM run)."""
