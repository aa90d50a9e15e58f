"""Call quality: E-model MOS and normalised WebRTC statistics (pure functions)."""
