"""The packaged configs (installed as fastft.configs): `fastft-train demo` finds configs/demo.yaml here by name
(fastft/config.py: find_config). Holds no code."""
