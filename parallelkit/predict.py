"""``python -m parallelkit.predict``: the command; its work is in ``parallelkit/advisor/predict.py``."""
from parallelkit.advisor.predict import main

if __name__ == "__main__":
    main()
