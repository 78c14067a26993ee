"""Data files of the task registry (json/csv); a package so that wheels ship them."""
