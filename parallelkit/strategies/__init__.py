"""One file per backend; ``conf/strategy/<name>.yaml`` names the class (``_target_``).

Optional backends (DeepSpeed, FairScale) are imported inside their own module only, so
``import parallelkit`` works without them.
"""
