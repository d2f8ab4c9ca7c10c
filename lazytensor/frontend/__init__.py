"""Frontend: what a user holds (envoys, models, handles on served models, input handling).

The top layer of the library; nothing below imports it.
"""
