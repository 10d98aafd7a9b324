"""Operations on a store, above the library: ``doctor`` (can it hold a cache?) and ``gc`` (expire)."""
