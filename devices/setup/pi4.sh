#!/usr/bin/env bash
# Install edgesparse on the Raspberry Pi 4 Model B from a wheelhouse: devices/setup/pi4.sh WHEELHOUSE [VENV]
exec "$(dirname "$0")/install.sh" pi4 "$@"
