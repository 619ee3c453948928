"""Progress bars for long work (training epochs, scoring passes): tqdm when it is installed."""


from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], total: Optional[int] = None, enabled: bool = True,
             description: str = "") -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar that clears when done, or as is."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a bare environment: no bar, same results
        return iterable
    return tqdm(iterable, total=total, desc=description, leave=False)
