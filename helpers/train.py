"""``python -m helpers.train``: train the miniature DeepSeek-V3 and export it (see :mod:`helpers.model.train`)."""

from helpers.model.train import main

if __name__ == "__main__":
    main()
