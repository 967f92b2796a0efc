"""The strategies' implementations against Lightning, FSDP2 and DeepSpeed (imported when a strategy is built, never
when the registry is read): fsdp2.py (FSDP2 through ModelParallelStrategy), zero.py (Lightning's DeepSpeedStrategy
writing our checkpoint layout, also on the CPU), deepspeed_config.py (the DeepSpeed JSON from our config), elastic.py
and rendezvous.py (the process group of each torchrun restart attempt)."""
