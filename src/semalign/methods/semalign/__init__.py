"""SemAlign: latent semantic alignment (arXiv 2510.24208). v1 exact (`recipe`), v2/ACL frontier reconstruction (`frontier`)."""
