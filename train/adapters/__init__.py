"""Parameter-efficient fine-tuning: LoRA adapters through the `peft` library (lora.py), wrapped around the model a
task builds (train/job.py's one hook) and saved in PEFT's format for transformers + peft users."""
