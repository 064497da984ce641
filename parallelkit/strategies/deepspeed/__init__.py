"""DeepSpeed's backends: ZeRO (zero.py), its pipeline engine (pipe.py), GPT-NeoX's 3D (neox_3d.py)."""


def __getattr__(name: str):
    if name == "DeepSpeedStrategy":  # where configs saved before the move name it
        from parallelkit.strategies.deepspeed.zero import DeepSpeedStrategy

        return DeepSpeedStrategy
    raise AttributeError(name)
