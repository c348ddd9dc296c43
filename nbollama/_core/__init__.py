"""Private implementation; the public modules in ``nbollama`` re-export what users need."""
