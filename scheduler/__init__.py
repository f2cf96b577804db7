"""kvtier.scheduler: what moves, when and why."""
