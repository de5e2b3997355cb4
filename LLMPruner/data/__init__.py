"""Text sources: calibration samples for importance estimation, and evaluation corpora."""
