"""Progress bars for long work (training epochs, scoring passes): tqdm when it is installed."""


def progress(iterable, total=None, enabled=True, description=""):
    """``iterable`` wrapped in a tqdm bar that clears when done, or as is."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a bare environment: no bar, same results
        return iterable
    return tqdm(iterable, total=total, desc=description, leave=False)
