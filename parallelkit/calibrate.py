"""``python -m parallelkit.calibrate``: the command; its work is in ``parallelkit/measure/calibrate.py``.

``python -m parallelkit.calibrate --framework [--force] [overrides]``: every preset's framework time for the
projection (those not cached; ``--force``: all), measured on narrow copies of the run the overrides describe (``parallelkit/advisor/framework.py``)."""
import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["--framework"]:
        from parallelkit.advisor.framework import main
        from parallelkit.advisor.projection import project_plan

        main(sys.argv[2:], project_plan)
    else:
        from parallelkit.measure.calibrate import main

        main()
