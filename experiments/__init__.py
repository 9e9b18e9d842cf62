"""absl entry points; each `python -m experiments.<name> --helpfull` lists its flags."""
