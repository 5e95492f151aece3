"""Fine-tuning components a FineTuneTask holds (distillation from a teacher); the task holds them, not owns them."""
