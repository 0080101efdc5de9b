"""Small, pure torch reference functions: the test oracle for any faster kernel that replaces them."""
