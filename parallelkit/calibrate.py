"""``python -m parallelkit.calibrate``: the command; its work is in ``parallelkit/measure/calibrate.py``."""
from parallelkit.measure.calibrate import main

if __name__ == "__main__":
    main()
