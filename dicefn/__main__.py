"""Runs the dicefn demo: ``python -m dicefn``."""

from dicefn._src.demo import main

if __name__ == "__main__":
    main()
