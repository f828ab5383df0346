//! Training: the loss (the trainer follows).

pub mod loss;
