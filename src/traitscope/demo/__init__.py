"""`traitscope demo`: the whole workflow on an embedded default, ending in an HTML report."""
