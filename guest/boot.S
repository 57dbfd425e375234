/*
 * Boot stub of the Faultline test guest: everything that runs at CPL0.
 *
 * Two ways in:
 *   fl_entry32  a multiboot v1 loader (QEMU -kernel) jumps here in 32-bit
 *               protected mode. We build identity page tables with 2 MiB
 *               pages at GUEST_PAGE_TABLES, enter long mode, map RAM above
 *               4 GiB (fl_boot_map_ram) and continue at fl_entry64 as vCPU 0
 *               of 1.
 *   fl_entry64  the Faultline VMM starts every vCPU here at once, in the
 *               state abi.h describes: RDI = multiboot info, RSI = vCPU
 *               index, RDX = vCPU count.
 *
 * fl_entry64 is short on purpose (on PVM every CPL0 instruction is
 * emulated): GDT, this vCPU's TSS and IDT, then IRETQ to fl_main at CPL3
 * with IOPL=3 and interrupts off. A vCPU writes only its own TSS, its own
 * TSS descriptor in the shared GDT, its own IDT and its own stacks; the
 * shared descriptors have their accessed bits preset so that the CPU never
 * writes them either.
 */
#include "guest.h"

#define CR0_PE (1 << 0)
#define CR0_PG (1 << 31)
#define CR4_TSD (1 << 2)
#define CR4_PAE (1 << 5)
#define MSR_EFER 0xc0000080
#define EFER_LME (1 << 8)
#define PTE_PRESENT_RW_USER 0x7 /* the workload runs at CPL3 */
#define PTE_LARGE 0x80
#define GATE_INTERRUPT_DPL0 0x8e
#define TSS_AVAILABLE_64 0x89
#define RFLAGS_USER 0x3002 /* IOPL=3, IF=0, reserved bit 1 */

/* ---------------------------------------------------------------------------
 * The multiboot header, with the address fields (flag bit 16) so that QEMU
 * loads this ELF64 file as a flat image, followed at once by struct
 * fl_image_header (abi.h). The linker script puts this section first.
 */
	.section .multiboot, "a"
	.balign 4
	.globl fl_multiboot_header
fl_multiboot_header:
	.long MB_HEADER_MAGIC
	.long MB_HEADER_FLAGS
	.long -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)
	.long fl_multiboot_header /* header_addr */
	.long fl_image_start      /* load_addr */
	.long fl_load_end         /* load_end_addr */
	.long fl_image_end        /* bss_end_addr */
	.long fl_entry32          /* entry_addr */
fl_image_header:
	.long GUEST_IMAGE_MAGIC
	.long GUEST_IMAGE_VERSION
	.quad fl_entry64
	.quad fl_image_end

/* ---------------------------------------------------------------------------
 * Multiboot entry: EAX = magic, EBX = multiboot info, paging off. Builds the
 * same tables the VMM would (abi.h): PML4 at +0, PDPT at +4 KiB, one page
 * directory per GiB from +8 KiB, here the first 4 GiB.
 */
	.text
	.code32
	.globl fl_entry32
fl_entry32:
	cli
	cld
	cmpl $MB_BOOT_MAGIC, %eax
	jne fl_entry32_bad
	movl %ebx, fl_boot_mbi

	movl $GUEST_PAGE_TABLES, %edi /* zero the PML4 and the PDPT */
	xorl %eax, %eax
	movl $(2 * 4096 / 4), %ecx
	rep stosl
	movl $(GUEST_PAGE_TABLES + 0x1000 + PTE_PRESENT_RW_USER), GUEST_PAGE_TABLES

	movl $(GUEST_PAGE_TABLES + 0x1000), %edi /* PDPT[0..3] */
	movl $(GUEST_PAGE_TABLES + 0x2000 + PTE_PRESENT_RW_USER), %eax
	movl $4, %ecx
1:	movl %eax, (%edi)
	addl $0x1000, %eax
	addl $8, %edi
	loop 1b

	movl $(GUEST_PAGE_TABLES + 0x2000), %edi /* 4 page directories */
	movl $(PTE_PRESENT_RW_USER | PTE_LARGE), %eax
	movl $(4 * 512), %ecx
2:	movl %eax, (%edi)
	movl $0, 4(%edi)
	addl $0x200000, %eax
	addl $8, %edi
	loop 2b

	lgdt fl_gdt_ptr
	movl $GUEST_PAGE_TABLES, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	andl $~CR4_TSD, %eax
	movl %eax, %cr4
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	ljmp $GUEST_KERNEL_CS, $fl_entry_multiboot64

fl_entry32_bad: /* not started by a multiboot loader */
	movb $GUEST_EXIT_BAD_PARAMS, %al
	outb %al, $GUEST_PORT_EXIT
3:	hlt
	jmp 3b

	.code64
fl_entry_multiboot64:
	movl $GUEST_KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	leaq fl_kernel_stacks + (1 << GUEST_KSTACK_SHIFT)(%rip), %rsp
	movl fl_boot_mbi(%rip), %edi
	call fl_boot_map_ram
	movl fl_boot_mbi(%rip), %edi
	xorl %esi, %esi
	movl $1, %edx
	jmp fl_entry64

/* ---------------------------------------------------------------------------
 * 64-bit entry, CPL0, on every vCPU. RDI = multiboot info, RSI = index,
 * RDX = count; the VMM's GDT, page tables and flat segments are in use.
 * Keeps RDI/RSI/RDX in R12/R13/R14 and passes them on to fl_main.
 */
	.globl fl_entry64
fl_entry64:
	cld
	cmpq $GUEST_MAX_VCPUS, %rdx
	ja fl_entry64_bad
	cmpq %rdx, %rsi
	jae fl_entry64_bad
	movq %rdi, %r12
	movq %rsi, %r13
	movq %rdx, %r14

	movq %rsi, %rax /* kernel stack: the top of this vCPU's slot */
	incq %rax
	shlq $GUEST_KSTACK_SHIFT, %rax
	leaq fl_kernel_stacks(%rip), %rsp
	addq %rax, %rsp
	movq %rsp, %r15

	lgdt fl_gdt_ptr(%rip)
	pushq $GUEST_KERNEL_CS
	leaq 1f(%rip), %rax
	pushq %rax
	lretq
1:	movl $GUEST_KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs

	/* This vCPU's TSS: RSP0 for exceptions from CPL3, I/O bitmap (zero
	 * in .bss: every port allowed) and its terminating byte. */
	imulq $GUEST_TSS_SIZE, %r13, %rbx
	leaq fl_tss(%rip), %rax
	addq %rax, %rbx
	movq %r15, 4(%rbx)
	movw $GUEST_TSS_IOMAP, 102(%rbx)
	movb $0xff, GUEST_TSS_LIMIT(%rbx)

	/* Its descriptor (16 bytes; the image lies below 4 GiB). */
	movq %rbx, %rax
	andl $0xffffff, %eax
	shlq $16, %rax /* base[23:0] */
	movq %rbx, %rcx
	shrq $24, %rcx
	shlq $56, %rcx /* base[31:24] */
	orq %rcx, %rax
	movabsq $((TSS_AVAILABLE_64 << 40) | GUEST_TSS_LIMIT), %rcx
	orq %rcx, %rax
	movq %r13, %rdx
	shlq $4, %rdx
	leaq fl_gdt + GUEST_TSS_SEL0(%rip), %rcx
	movq %rax, (%rcx, %rdx)
	movq %rbx, %rax
	shrq $32, %rax
	movq %rax, 8(%rcx, %rdx)
	leal GUEST_TSS_SEL0(%rdx), %eax
	ltr %ax

	/*
	 * Its IDT. The stubs are 16 bytes apart in a block that does not cross
	 * a 64 KiB boundary (guest.ld checks), so gate n = gate 0 + 16 n.
	 */
	imulq $(GUEST_IDT_VECTORS * 16), %r13, %rdi
	leaq fl_idt(%rip), %rax
	addq %rax, %rdi
	leaq fl_isr_stubs(%rip), %rax
	movq %rax, %rdx
	shrq $16, %rdx
	shlq $48, %rdx /* offset[31:16] */
	movzwl %ax, %eax /* offset[15:0] */
	orq %rdx, %rax
	movabsq $((GATE_INTERRUPT_DPL0 << 40) | (GUEST_KERNEL_CS << 16)), %rdx
	orq %rdx, %rax
	movq %rdi, %rdx
	movl $GUEST_IDT_VECTORS, %ecx
2:	movq %rax, (%rdx)
	movq $0, 8(%rdx)
	addq $16, %rax
	addq $16, %rdx
	decl %ecx
	jnz 2b
	subq $16, %rsp
	movw $(GUEST_IDT_VECTORS * 16 - 1), (%rsp)
	movq %rdi, 2(%rsp)
	lidt (%rsp)
	addq $16, %rsp

	/* RDTSC must work at CPL3; write CR4 only if it has to change. */
	movq %cr4, %rax
	testl $CR4_TSD, %eax
	jz 3f
	andq $~CR4_TSD, %rax
	movq %rax, %cr4
3:
	/* To CPL3: SS, RSP, RFLAGS, CS, RIP. */
	movq %r13, %rax
	incq %rax
	shlq $GUEST_USTACK_SHIFT, %rax
	leaq fl_user_stacks(%rip), %rcx
	addq %rcx, %rax
	pushq $(GUEST_USER_DS | 3)
	pushq %rax
	pushq $RFLAGS_USER
	pushq $(GUEST_USER_CS | 3)
	leaq fl_user_start(%rip), %rax
	pushq %rax
	movq %r12, %rdi
	movq %r13, %rsi
	movq %r14, %rdx
	iretq

fl_entry64_bad: /* vCPU index or count out of range */
	movb $GUEST_EXIT_BAD_PARAMS, %al
	outb %al, $GUEST_PORT_EXIT
4:	hlt
	jmp 4b

/* CPL3 from here on: a normal call frame for fl_main, which never returns. */
fl_user_start:
	xorl %ebp, %ebp
	call fl_main
5:	pause
	jmp 5b

/* ---------------------------------------------------------------------------
 * Exception stubs, 16 bytes apart: push a zero error code where the CPU
 * pushes none, then the vector.
 */
.macro ISR_STUB n
	.balign 16
	.if !((\n == 8) || (\n >= 10 && \n <= 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30))
	pushq $0
	.endif
	pushq $\n
	jmp fl_isr_common
.endm

	.balign 1024
	.globl fl_isr_stubs
fl_isr_stubs:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	ISR_STUB \n
	.endr
	.balign 16
	.globl fl_isr_stubs_end
fl_isr_stubs_end:

/*
 * Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. Reports through
 * fl_panic(vector, error, rip, rsp, cr2, vcpu), unless this vCPU armed the
 * triple fault: then load an IDT with limit 0 and fault, so that neither
 * #UD nor #GP nor #DF can be delivered and the CPU shuts down. (An INT from
 * CPL3 through a DPL3 gate would be simpler, but PVM does not emulate INT
 * outside real mode; exceptions it does deliver.)
 */
fl_isr_common:
	xorl %eax, %eax
	str %ax
	subl $GUEST_TSS_SEL0, %eax
	shrl $4, %eax
	movl %eax, %r9d
	cmpl $GUEST_MAX_VCPUS, %eax
	jae 1f
	leaq fl_triple_fault_armed(%rip), %rdx
	cmpb $0, (%rdx, %rax)
	jne fl_triple_fault
1:	movq 0(%rsp), %rdi
	movq 8(%rsp), %rsi
	movq 16(%rsp), %rdx
	movq 40(%rsp), %rcx
	movq %cr2, %r8
	andq $-16, %rsp
	call fl_panic
2:	hlt
	jmp 2b

fl_triple_fault:
	lidt fl_null_idt_ptr(%rip)
	ud2

/* ---------------------------------------------------------------------------
 * Descriptor tables. Data and code descriptors have the accessed bit set.
 */
	.data
	.balign 16
fl_gdt:
	.quad 0
	.quad 0x00af9b000000ffff /* 0x08 kernel code, 64-bit */
	.quad 0x00cf93000000ffff /* 0x10 kernel data */
	.quad 0x00cff3000000ffff /* 0x18 user data */
	.quad 0x00affb000000ffff /* 0x20 user code, 64-bit */
	.fill 2 * GUEST_MAX_VCPUS, 8, 0 /* 0x28: a TSS descriptor per vCPU */
fl_gdt_end:

	.balign 16
	.word 0, 0, 0
fl_gdt_ptr:
	.word fl_gdt_end - fl_gdt - 1
	.quad fl_gdt

	.balign 16
	.word 0, 0, 0
fl_null_idt_ptr:
	.word 0
	.quad 0

fl_boot_mbi:
	.long 0

	.globl fl_triple_fault_armed
fl_triple_fault_armed:
	.fill GUEST_MAX_VCPUS, 1, 0

	.bss
	.balign 4096
fl_kernel_stacks:
	.skip GUEST_MAX_VCPUS << GUEST_KSTACK_SHIFT
fl_user_stacks:
	.skip GUEST_MAX_VCPUS << GUEST_USTACK_SHIFT
	.balign 128
fl_tss:
	.skip GUEST_MAX_VCPUS * GUEST_TSS_SIZE
	.balign 16
fl_idt:
	.skip GUEST_MAX_VCPUS * GUEST_IDT_VECTORS * 16

	.section .note.GNU-stack, "", @progbits
