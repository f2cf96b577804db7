"""kvtier.tiers: where KV bytes live and how they move."""
