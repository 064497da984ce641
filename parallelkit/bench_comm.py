"""``python -m parallelkit.bench_comm``: the command; its work is in ``parallelkit/advisor/bench_comm.py``."""
from parallelkit.advisor.bench_comm import main

if __name__ == "__main__":
    main()
