"""Compile checks for accelerators without the hardware (`make accel-check`)."""
