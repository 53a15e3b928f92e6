# benchmark packages
