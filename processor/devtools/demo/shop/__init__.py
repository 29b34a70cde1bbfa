"""The demo's shop: each function returns how long its call took (simulated, in ms) or
raises, and behaves as version 1.0.0 or 2.0.0 of the shop would."""

V1, V2 = "1.0.0", "2.0.0"
