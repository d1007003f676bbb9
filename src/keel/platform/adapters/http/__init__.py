"""HTTP building blocks shared by every context's Litestar controllers."""
