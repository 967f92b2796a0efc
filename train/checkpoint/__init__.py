"""Checkpoints: layout.py (the folders and meta.json, no torch), weights.py (safetensors weights, no Lightning),
io.py (the Lightning CheckpointIO that writes a step dir atomically), callbacks.py (step and best checkpoints),
export.py (Hugging Face folders in and out)."""
