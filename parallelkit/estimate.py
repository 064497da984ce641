"""``python -m parallelkit.estimate``: the command; its work is in ``parallelkit/advisor/estimate.py``."""
from parallelkit.advisor.estimate import main

if __name__ == "__main__":
    main()
