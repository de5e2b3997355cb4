"""Score: how important each unit is. ``estimate`` (random, L1/L2 magnitude, Taylor ``vectorize`` /
``param_first`` / ``param_second`` / ``param_mix``), ``activations`` (forward-only FLAP fluctuation and Wanda
from calibration statistics), ``depth`` (whole decoder layers: block influence, perplexity, Taylor)."""
