"""workbench: SFT, reward modelling, REINFORCE, RLOO, PPO, GRPO and DPO on identical toy
language-model tasks, judged against exact ground truth."""

__version__ = "0.1.0"
