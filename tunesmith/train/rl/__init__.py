"""Reinforcement learning: GRPO, its rollouts, and the reward functions."""
