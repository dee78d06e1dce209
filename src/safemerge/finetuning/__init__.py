"""LoRA or full fine-tuning with TRL, recorded so a run can be repeated."""
