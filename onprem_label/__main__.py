"""Allow `python -m onprem_label`."""

from onprem_label.cli import main

main()
