"""Downstream evaluation of converted models: tasks, metrics, fine-tuning (full or adapters), the MLM probe."""
