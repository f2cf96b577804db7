"""The cost model and where its numbers come from: `model` (predictions), `fit` (least squares on
measurements), `hardware` (named profiles), `calibrate` and `rigs` (measuring this machine)."""
