"""Train / fine-tune a GPT-2: `python train/run.py [group=option ...] [key=value ...]`.

The entry point users type; the Hydra shell lives in train/cli/run.py and the job itself in train/job.py.
"""

from train.cli.run import cli

if __name__ == "__main__":
    cli()
