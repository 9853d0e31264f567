"""(being written)"""

FORMATS: tuple = ()
