"""Imported first by every stage script, before the imports that take a second or two:
Ctrl-C from then on ends the stage with `error: interrupted` and exit status 130, as it does
once the stage's main runs (`retrain.errors.handle_interrupts_from_here`)."""

from retrain.errors import handle_interrupts_from_here

handle_interrupts_from_here()
