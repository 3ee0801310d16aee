"""Private implementation modules of dicefn; import from :mod:`dicefn` instead."""
