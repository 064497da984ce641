"""``python -m parallelkit.train RUN_DIR``: one worker of a saved run (the launcher starts
``parallelkit.runtime.loop``; this name is kept for one release)."""
from parallelkit.runtime.loop import main

if __name__ == "__main__":
    main()
