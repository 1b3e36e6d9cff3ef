"""Integrations with training frameworks that take plugins: :mod:`pema_triton.integrations.axolotl`."""
